//! Kiln's device agent for ARM Linux boards (std).
//!
//! - [`api`]: the fleet HTTP API's wire types, shared with the server in the `kiln` host tool
//!   (which depends on this crate; dependencies point from tools to firmware).
//! - [`store`]: A/B model files and the persisted state, written crash-safe.
//! - [`model`]: a verified model in memory (self-test, inference, BASELINE bins).
//! - [`agent`]: the check-in / download / verify / trial / confirm-or-revert state machine.
//! - [`service`]: the local inference socket.
//! - [`sim`]: many agents in one process against a server, with injected faults.
#![deny(missing_docs)]

pub mod agent;
pub mod api;
pub mod model;
pub mod service;
pub mod sim;
pub mod store;
