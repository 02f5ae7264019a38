//! Kiln's device side, `#![no_std]` and allocation-free: A/B model slots on NOR flash, the
//! power-cut-proof update state machine, the key ring, and the update wire protocol.
//!
//! See `docs/UPDATE_PROTOCOL.md` for the protocol and the update state machine.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod flash;
pub mod frame;
pub mod keys;
#[cfg(feature = "std")]
pub mod powercut;
pub mod protocol;
pub mod service;
#[cfg(feature = "std")]
pub mod sim;
pub mod state;
#[cfg(feature = "std")]
pub mod testkit;
pub mod update;

/// Largest flash write unit the update logic supports.
pub const MAX_WRITE_SIZE: usize = 64;

pub use flash::{Layout, MappedFlash, Region};
pub use update::{BootReport, Config, Device, Running, UpdateError};
