//! Errors of the runtime: small, `Copy`, no strings built at run time (the device has no heap).
//! Each variant's message says what is wrong, why, and what to do.

use core::fmt;

/// Why an artifact was refused, or why an interpreter could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelError {
    /// The bytes end before a structure that must be there.
    Truncated {
        /// The structure that was cut off.
        what: &'static str,
    },
    /// The first four bytes are not `KILN`.
    BadMagic,
    /// The artifact uses a format version this runtime does not read.
    UnsupportedFormatVersion {
        /// The version found.
        found: u16,
    },
    /// A fixed header or trailer field has a value the format does not allow.
    BadField {
        /// The field.
        field: &'static str,
    },
    /// The section table is inconsistent (overlap, misalignment, out of range, duplicate, missing).
    BadSection {
        /// Which rule failed.
        reason: &'static str,
    },
    /// The SHA-256 in the trailer does not match the bytes.
    DigestMismatch,
    /// The artifact bytes or the arena do not start at a 16-byte aligned address.
    Misaligned {
        /// Which buffer.
        what: &'static str,
    },
    /// A postcard structure in a section does not decode.
    Decode {
        /// The structure.
        what: &'static str,
    },
    /// A tensor definition is invalid.
    BadTensor {
        /// Tensor index.
        index: u16,
        /// Which rule failed.
        reason: &'static str,
    },
    /// An op definition is invalid or inconsistent with its tensors.
    BadOp {
        /// Op index (from 0, in execution order).
        index: u16,
        /// Which rule failed.
        reason: &'static str,
    },
    /// Two tensors that are alive at the same time share arena bytes.
    OverlappingTensors {
        /// First tensor.
        a: u16,
        /// Second tensor.
        b: u16,
    },
    /// The arena handed to the interpreter is smaller than the artifact requires.
    ArenaTooSmall {
        /// Bytes the artifact needs.
        needed: u32,
        /// Bytes given.
        given: usize,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ModelError::Truncated { what } => write!(
                f,
                "artifact is truncated: the {what} is cut off; the file is incomplete, copy or download it again"
            ),
            ModelError::BadMagic => write!(
                f,
                "not a Kiln artifact: it does not start with \"KILN\"; pass a .kiln file written by `kiln convert`"
            ),
            ModelError::UnsupportedFormatVersion { found } => write!(
                f,
                "artifact format version {found} is not supported by this runtime (it reads version 1); convert the model again with a matching kiln"
            ),
            ModelError::BadField { field } => write!(
                f,
                "artifact header field `{field}` has an invalid value; the file is corrupt, write it again"
            ),
            ModelError::BadSection { reason } => write!(
                f,
                "artifact section table is invalid: {reason}; the file is corrupt, write it again"
            ),
            ModelError::DigestMismatch => write!(
                f,
                "artifact SHA-256 does not match its contents: it was modified or damaged in transit; use an intact copy"
            ),
            ModelError::Misaligned { what } => write!(
                f,
                "the {what} is not 16-byte aligned; place it at an address that is a multiple of 16"
            ),
            ModelError::Decode { what } => write!(
                f,
                "artifact {what} does not decode; the file is corrupt or from an incompatible kiln"
            ),
            ModelError::BadTensor { index, reason } => write!(
                f,
                "artifact tensor {index} is invalid: {reason}; the file is corrupt, write it again"
            ),
            ModelError::BadOp { index, reason } => write!(
                f,
                "artifact op {index} is invalid: {reason}; the file is corrupt or uses an unsupported case"
            ),
            ModelError::OverlappingTensors { a, b } => write!(
                f,
                "artifact plans tensors {a} and {b} into the same arena bytes while both are alive; the memory plan is corrupt, write the artifact again"
            ),
            ModelError::ArenaTooSmall { needed, given } => write!(
                f,
                "arena too small: the model needs {needed} bytes, {given} were given; pass an arena of at least `arena_bytes` from `kiln inspect`"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ModelError {}

/// Why a call on a ready interpreter failed. The interpreter stays usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvokeError {
    /// Input or output index out of range.
    NoSuchTensor {
        /// The index asked for.
        index: usize,
    },
    /// The data handed in has the wrong number of elements.
    LengthMismatch {
        /// Elements the tensor has.
        expected: usize,
        /// Elements given.
        given: usize,
    },
    /// The data handed in has a different element type than the tensor.
    TypeMismatch,
    /// The model failed validation while running (cannot happen for a model that loaded).
    Model(ModelError),
}

impl fmt::Display for InvokeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InvokeError::NoSuchTensor { index } => {
                write!(f, "no input or output with index {index}; see `kiln inspect` for the model's inputs and outputs")
            }
            InvokeError::LengthMismatch { expected, given } => write!(
                f,
                "tensor has {expected} elements but {given} were given; reshape the data to the model's input shape"
            ),
            InvokeError::TypeMismatch => write!(
                f,
                "data type does not match the tensor; pass int8 for int8 tensors or use the float setter"
            ),
            InvokeError::Model(e) => e.fmt(f),
        }
    }
}

impl From<ModelError> for InvokeError {
    fn from(e: ModelError) -> Self {
        InvokeError::Model(e)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for InvokeError {}
