//! Kiln's inference runtime: `#![no_std]`, no allocator, no global state.
//!
//! Hand it an artifact's bytes and one `&mut [u8]` arena of the size the artifact states; set
//! inputs, invoke, read outputs. Every offset, length, shape, index and quantization parameter in
//! the artifact is validated before anything uses it: a malformed artifact is an `Err`, never a
//! panic or an out-of-bounds access.
#![no_std]
#![deny(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "candle")]
pub mod candle_backend;
pub mod error;
pub mod format;
pub mod graph;
pub mod interpreter;
pub mod kernels;
pub mod model;
pub mod prepare;
pub mod quant;
pub mod sections;
pub mod signature;
#[cfg(feature = "std")]
pub mod writer;

pub use error::{InvokeError, ModelError};
pub use interpreter::{Arena, Interpreter};
pub use model::Model;
