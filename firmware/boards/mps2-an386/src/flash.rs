//! The model flash: NOR flash semantics over the upper half of SSRAM1.
//!
//! The MPS2 boards have no flash controller under QEMU; SSRAM1 (0x0000_0000, 4 MiB) is RAM that
//! QEMU fills with the ELF image at every reset. `memory.x` keeps the image in the lower half and
//! names the upper half `MODEL_FLASH`; no ELF section lies there, so what the firmware writes
//! survives a system reset (`SCB::sys_reset`, as after a commit) within one QEMU run. A new QEMU
//! run starts with it zeroed, which the state journal reads as "no state" (it erases before it
//! writes).
//!
//! [`ModelFlash`] behaves like NOR flash so that the update logic runs exactly as on a real part:
//! erase sets whole 4 KiB sectors to `0xFF`, programming writes whole 8-byte words, and a word
//! that is not erased is **refused** ([`FlashError::NotErased`]), never silently ANDed, so a bug in
//! the update logic shows up here as it would in the simulator.
//!
//! ```text
//! model flash (2 MiB at 0x0020_0000)
//! offset      size     what
//! 0x00_0000     8 KiB  state journal: two 4 KiB banks
//! 0x00_2000   512 KiB  slot A
//! 0x08_2000   512 KiB  slot B
//! 0x10_2000  1016 KiB  unused
//! ```

use core::sync::atomic::{AtomicBool, Ordering};
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use kiln_device::{Layout, MappedFlash, Region};

/// Erase sector size.
pub const ERASE_SIZE: usize = 4096;
/// Program unit.
pub const WRITE_SIZE: usize = 8;
/// One model slot.
pub const SLOT_LEN: u32 = 512 * 1024;
/// The state journal: two banks of one sector each.
pub const STATE_LEN: u32 = 2 * ERASE_SIZE as u32;

/// Where the state journal and the slots lie in the model flash.
pub const LAYOUT: Layout = Layout {
    state: Region {
        offset: 0,
        len: STATE_LEN,
    },
    slots: [
        Region {
            offset: STATE_LEN,
            len: SLOT_LEN,
        },
        Region {
            offset: STATE_LEN + SLOT_LEN,
            len: SLOT_LEN,
        },
    ],
};

extern "C" {
    // Defined in memory.x: the bounds of the MODEL_FLASH memory region.
    static _kiln_model_flash_start: u8;
    static _kiln_model_flash_end: u8;
}

/// Set once the model flash has been handed out (it is one `&'static mut`).
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why a flash operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashError {
    /// Offset or length not a multiple of the write (or erase) size, or `from > to`.
    NotAligned,
    /// The range reaches past the end of the flash.
    OutOfBounds,
    /// Programming a word that is not erased (a bug in the caller: erase first).
    NotErased,
}

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            FlashError::NotAligned => NorFlashErrorKind::NotAligned,
            FlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            FlashError::NotErased => NorFlashErrorKind::Other,
        }
    }
}

/// The model flash (see the module docs).
pub struct ModelFlash {
    mem: &'static mut [u8],
}

impl ModelFlash {
    /// The model flash, the first time it is asked for; `None` afterwards.
    pub fn take() -> Option<Self> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return None;
        }
        let start = core::ptr::addr_of!(_kiln_model_flash_start) as usize;
        let end = core::ptr::addr_of!(_kiln_model_flash_end) as usize;
        let len = end.checked_sub(start)?;
        // SAFETY: memory.x defines [start, end) as the MODEL_FLASH region of SSRAM1: ordinary RAM,
        // readable and writable, 16-byte aligned, and outside every section of the image, so
        // nothing else in the program refers to it. `TAKEN` makes this the only reference ever
        // created to it, so it is never aliased. Any byte value is a valid `u8`.
        let mem = unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len) };
        Some(ModelFlash { mem })
    }

    /// The byte range `[offset, offset + len)`, if it lies inside the flash.
    fn range(&self, offset: u32, len: usize) -> Result<core::ops::Range<usize>, FlashError> {
        let start = offset as usize;
        let end = start.checked_add(len).ok_or(FlashError::OutOfBounds)?;
        if end > self.mem.len() {
            return Err(FlashError::OutOfBounds);
        }
        Ok(start..end)
    }
}

impl ErrorType for ModelFlash {
    type Error = FlashError;
}

impl ReadNorFlash for ModelFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        let range = self.range(offset, bytes.len())?;
        let src = self.mem.get(range).ok_or(FlashError::OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.mem.len()
    }
}

impl NorFlash for ModelFlash {
    const WRITE_SIZE: usize = WRITE_SIZE;
    const ERASE_SIZE: usize = ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        if from > to
            || !(from as usize).is_multiple_of(ERASE_SIZE)
            || !(to as usize).is_multiple_of(ERASE_SIZE)
        {
            return Err(FlashError::NotAligned);
        }
        let range = self.range(from, (to - from) as usize)?;
        self.mem
            .get_mut(range)
            .ok_or(FlashError::OutOfBounds)?
            .fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        if !(offset as usize).is_multiple_of(WRITE_SIZE) || !bytes.len().is_multiple_of(WRITE_SIZE)
        {
            return Err(FlashError::NotAligned);
        }
        let range = self.range(offset, bytes.len())?;
        let dst = self.mem.get_mut(range).ok_or(FlashError::OutOfBounds)?;
        // Every target word must be erased; checked before anything is programmed.
        if dst.iter().any(|&b| b != 0xFF) {
            return Err(FlashError::NotErased);
        }
        dst.copy_from_slice(bytes);
        Ok(())
    }
}

impl MappedFlash for ModelFlash {
    fn mapped(&self) -> &[u8] {
        self.mem
    }
}
