//! Kiln's device agent for ARM Linux boards (std).
//!
//! [`api`] is the fleet HTTP API's wire types, shared with the server in the `kiln` host tool
//! (which depends on this crate; dependencies point from tools to firmware).
#![deny(missing_docs)]

pub mod api;
