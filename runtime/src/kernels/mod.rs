//! Kernels: one file per op family. Each holds the op's geometry/params, a portable reference
//! body for int8 (TFLM's exact arithmetic) and a float body generic over [`Float`] (f32 and f16
//! storage, f32 arithmetic), and its tests against an independent straightforward reference.
//!
//! Kernels are plain functions over slices. They are called by the interpreter only after the
//! model has been validated, so they trust their arguments and only `debug_assert!` them; they
//! never allocate and never return errors.

use crate::graph::Activation;

pub mod activation;
pub mod arch;
pub mod binary;
pub mod concat;
pub mod conv;
pub mod depthwise;
pub mod fully_connected;
pub mod lut;
pub mod mean;
pub mod pad;
pub mod pooling;
pub mod quantize;
pub mod softmax;
pub mod transpose;
pub mod unary;

/// A float storage type: values are loaded to f32, computed in f32 and stored back.
pub trait Float: Copy + Default + PartialOrd + bytemuck::Pod + core::fmt::Debug {
    /// Widen to f32.
    fn to_f32(self) -> f32;
    /// Narrow from f32 (round to nearest even for f16).
    fn from_f32(v: f32) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// Applies a fused float activation.
#[inline(always)]
pub fn activate(v: f32, act: Activation) -> f32 {
    match act {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::ReluN1To1 => v.clamp(-1.0, 1.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}
