//! The device's persistent update state and the power-cut-proof journal that stores it.
//!
//! The state area is split into two banks. Each state change appends one **record** to the
//! current bank; a record is written with a single program of whole words and sealed with the
//! first 8 bytes of the SHA-256 of its contents, so a torn write is recognised and ignored. On
//! boot the newest record (highest sequence number) with a valid seal is the state. When a bank
//! is full the other bank is erased and the next record goes there; the full bank keeps the newest
//! record until then, so no moment exists in which no valid record is on flash (after the first
//! one was written).
//!
//! ```text
//! record (RECORD_LEN bytes, unused tail left erased)
//! 0   4  magic "KST1"
//! 4   2  payload length (postcard)
//! 6   2  0
//! 8   8  seal: SHA-256(bytes 0..8 ++ payload)[..8]
//! 16  n  payload: postcard(State)
//! ```

use crate::flash::{FlashFailure, MappedFlash, Region};
use crate::keys::MAX_ADMITTED_KEYS;
use embedded_storage::nor_flash::NorFlashErrorKind;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes reserved for one journal record (a multiple of every supported write size).
pub const RECORD_LEN: usize = 512;
const RECORD_MAGIC: [u8; 4] = *b"KST1";
const RECORD_HEAD: usize = 16;

/// What a slot holds, as far as the state machine knows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotStatus {
    /// Written and verified, waiting for its trial boot.
    Trial,
    /// The confirmed model the device runs.
    Active,
    /// The model that was active before the current one (kept as a fallback).
    Previous,
    /// Refused or reverted; will be overwritten by the next update.
    Invalid,
}

/// What the state machine remembers about a slot's artifact.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotMeta {
    /// Status.
    pub status: SlotStatus,
    /// Model version from the (signed) header.
    pub version: u32,
    /// Security counter from the (signed) header.
    pub counter: u32,
    /// Artifact length in bytes.
    pub len: u32,
    /// SHA-256 of the artifact's body (from its trailer).
    pub digest: [u8; 32],
}

/// A slot on trial: it runs after the next reset and must pass its self-test.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trial {
    /// The slot.
    pub slot: u8,
    /// Boots left before the device gives up on it and reverts.
    pub boots_left: u8,
}

/// An update being received into a slot.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receiving {
    /// Target slot.
    pub slot: u8,
    /// Artifact length.
    pub total: u32,
    /// Expected body digest (from `Begin`).
    pub digest: [u8; 32],
    /// Bytes `[0, good)` are on flash and checked (a sector boundary or `total`).
    pub good: u32,
}

/// The last thing that happened to an update, for `device-info` and telemetry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new model was confirmed.
    Installed {
        /// Its version.
        version: u32,
    },
    /// A trial model was reverted.
    Reverted {
        /// Its version.
        version: u32,
        /// Why: a wire [`crate::protocol::ErrorCode`] value.
        reason: u16,
    },
    /// An update was refused before it was installed.
    Refused {
        /// Why: a wire [`crate::protocol::ErrorCode`] value.
        reason: u16,
    },
}

/// The persistent state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct State {
    /// Sequence number of the record (set by the journal).
    pub seq: u32,
    /// Lowest security counter a model may have; advances only when a model is confirmed.
    pub min_counter: u32,
    /// The confirmed slot, if any.
    pub active: Option<u8>,
    /// The slot on trial, if any.
    pub trial: Option<Trial>,
    /// What each slot holds.
    pub slots: [Option<SlotMeta>; 2],
    /// The update being received, if any.
    pub receiving: Option<Receiving>,
    /// Keys admitted by key records (on top of the compiled-in ones).
    pub admitted_keys: heapless::Vec<[u8; 32], MAX_ADMITTED_KEYS>,
    /// The last update event.
    pub last_event: Option<Event>,
}

/// Where the newest record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    bank: usize,
    index: usize,
}

/// The journal over the state region.
#[derive(Clone, Copy, Debug)]
pub struct Journal {
    region: Region,
    newest: Option<Position>,
}

fn seal(head: &[u8], payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(head);
    h.update(payload);
    let d = h.finalize();
    let mut s = [0u8; 8];
    s.copy_from_slice(&d[..8]);
    s
}

fn decode(rec: &[u8]) -> Option<State> {
    if rec[0..4] != RECORD_MAGIC || rec[6..8] != [0, 0] {
        return None;
    }
    let len = u16::from_le_bytes([rec[4], rec[5]]) as usize;
    let payload = rec.get(RECORD_HEAD..RECORD_HEAD + len)?;
    if seal(&rec[0..8], payload) != rec[8..16] {
        return None;
    }
    postcard::from_bytes(payload).ok()
}

impl Journal {
    fn bank_len(&self) -> usize {
        self.region.len as usize / 2
    }

    fn records_per_bank(&self) -> usize {
        self.bank_len() / RECORD_LEN
    }

    fn record_at<'f>(&self, mapped: &'f [u8], pos: Position) -> &'f [u8] {
        let at = self.region.offset as usize + pos.bank * self.bank_len() + pos.index * RECORD_LEN;
        &mapped[at..at + RECORD_LEN]
    }

    /// Reads the newest valid record. `None` state: a fresh device (or one whose only record
    /// write was torn).
    pub fn open<F: MappedFlash>(flash: &F, region: Region) -> (Self, Option<State>) {
        let mut j = Journal {
            region,
            newest: None,
        };
        let mut best: Option<State> = None;
        let mapped = flash.mapped();
        for bank in 0..2 {
            for index in 0..j.records_per_bank() {
                let pos = Position { bank, index };
                if let Some(s) = decode(j.record_at(mapped, pos)) {
                    if best.as_ref().is_none_or(|b| s.seq > b.seq) {
                        best = Some(s);
                        j.newest = Some(pos);
                    }
                }
            }
        }
        (j, best)
    }

    /// Appends `state` as the newest record (its `seq` is set to one more than the newest).
    ///
    /// # Errors
    /// The flash failed (on the simulator: power was cut).
    pub fn append<F: MappedFlash>(
        &mut self,
        flash: &mut F,
        state: &mut State,
    ) -> Result<(), FlashFailure> {
        state.seq = match self.newest {
            Some(p) => decode(self.record_at(flash.mapped(), p)).map_or(0, |s| s.seq) + 1,
            None => 1,
        };
        let mut buf = [0xFFu8; RECORD_LEN];
        let used = postcard::to_slice(&*state, &mut buf[RECORD_HEAD..])
            .map_err(|_| FlashFailure(NorFlashErrorKind::Other))?
            .len();
        buf[0..4].copy_from_slice(&RECORD_MAGIC);
        buf[4..6].copy_from_slice(&(used as u16).to_le_bytes());
        buf[6..8].copy_from_slice(&[0, 0]);
        let s = seal(&buf[0..8], &buf[RECORD_HEAD..RECORD_HEAD + used]);
        buf[8..16].copy_from_slice(&s);
        let write_len = (RECORD_HEAD + used).next_multiple_of(F::WRITE_SIZE);

        let pos = self.next_free(flash);
        let pos = match pos {
            Some(p) => p,
            None => {
                // Switch banks: erase the other one (the current bank keeps the newest record).
                let bank = self.newest.map_or(0, |p| 1 - p.bank);
                let from = self.region.offset + (bank * self.bank_len()) as u32;
                flash
                    .erase(from, from + self.bank_len() as u32)
                    .map_err(FlashFailure::of)?;
                Position { bank, index: 0 }
            }
        };
        let at = self.region.offset as usize + pos.bank * self.bank_len() + pos.index * RECORD_LEN;
        flash
            .write(at as u32, &buf[..write_len])
            .map_err(FlashFailure::of)?;
        self.newest = Some(pos);
        Ok(())
    }

    /// The first fully erased record slot after every used slot of the newest record's bank.
    fn next_free<F: MappedFlash>(&self, flash: &F) -> Option<Position> {
        let bank = self.newest?.bank;
        let mapped = flash.mapped();
        let n = self.records_per_bank();
        let mut index = n;
        while index > 0 {
            let rec = self.record_at(
                mapped,
                Position {
                    bank,
                    index: index - 1,
                },
            );
            if rec.iter().any(|&b| b != 0xFF) {
                break;
            }
            index -= 1;
        }
        (index < n).then_some(Position { bank, index })
    }
}
