//! NOR flash as the update logic sees it: `embedded-storage`'s [`NorFlash`] for erase and
//! program, plus a memory-mapped view so the runtime can run a model in place.

use embedded_storage::nor_flash::{NorFlash, NorFlashError, NorFlashErrorKind};

/// NOR flash that is also readable as memory (internal flash, XIP QSPI, or the simulator).
pub trait MappedFlash: NorFlash {
    /// The whole flash, as the CPU reads it. Its start must be 16-byte aligned.
    fn mapped(&self) -> &[u8];
}

/// A contiguous, erase-aligned part of the flash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Byte offset from the start of the flash.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

impl Region {
    /// One past the last byte.
    pub const fn end(&self) -> u32 {
        self.offset + self.len
    }
}

/// Where the state journal and the two model slots live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The state journal: two equal banks, each a whole number of erase sectors.
    pub state: Region,
    /// Model slots A and B.
    pub slots: [Region; 2],
}

/// Why a layout does not fit the flash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutError(pub &'static str);

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "flash layout: {}", self.0)
    }
}

impl Layout {
    /// Checks the layout against a flash: erase-aligned regions inside the flash that do not
    /// overlap, a state area of two equal banks.
    ///
    /// # Errors
    /// [`LayoutError`] naming the rule.
    pub fn check<F: MappedFlash>(&self, flash: &F) -> Result<(), LayoutError> {
        let erase = F::ERASE_SIZE as u32;
        let cap = flash.capacity() as u64;
        let regions = [self.state, self.slots[0], self.slots[1]];
        for r in regions {
            if r.offset % erase != 0 || r.len % erase != 0 || r.len == 0 {
                return Err(LayoutError("regions must be whole erase sectors"));
            }
            if r.offset as u64 + r.len as u64 > cap {
                return Err(LayoutError("a region lies outside the flash"));
            }
        }
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                if a.offset < b.end() && b.offset < a.end() {
                    return Err(LayoutError("regions overlap"));
                }
            }
        }
        if !self.state.len.is_multiple_of(2 * erase) {
            return Err(LayoutError(
                "the state area must be an even number of erase sectors",
            ));
        }
        if !(flash.mapped().as_ptr() as usize).is_multiple_of(16) {
            return Err(LayoutError("the mapped flash must start 16-byte aligned"));
        }
        if F::WRITE_SIZE > crate::MAX_WRITE_SIZE || !erase.is_multiple_of(F::WRITE_SIZE as u32) {
            return Err(LayoutError(
                "write size must divide the erase size and be at most 64",
            ));
        }
        Ok(())
    }
}

/// A flash operation failed (on the simulator: power was cut).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashFailure(pub NorFlashErrorKind);

impl FlashFailure {
    /// From any NOR flash error.
    pub fn of<E: NorFlashError>(e: E) -> Self {
        FlashFailure(e.kind())
    }
}

impl<T: MappedFlash> MappedFlash for &mut T {
    fn mapped(&self) -> &[u8] {
        T::mapped(self)
    }
}
