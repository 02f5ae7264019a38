//! `kiln`, the host tool, as a library: importers, the host IR, lowering and memory planning,
//! the artifact writer, and the helpers behind the CLI.

pub mod artifact;
pub mod convert;
pub mod import;
pub mod inspect;
pub mod ir;
pub mod lower;
pub mod npy;
pub mod plan;
pub mod runner;
