//! Kiln's device side, `#![no_std]` and allocation-free: A/B model slots on NOR flash, the
//! power-cut-proof update state machine, the key ring, and the update wire protocol.
//!
//! See `docs/UPDATE_PROTOCOL.md` for the protocol and the update state machine.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod keys;
