//! Random conv, depthwise and fully-connected cases shared by the fast paths' bit-exactness
//! tests (test builds only), with helpers that run a fast body and the portable one on a case.

extern crate std;

use crate::graph::{ClampI8, Requant};
use crate::kernels::conv::tests::{axis, clamp, requants, zero_point};
use crate::kernels::conv::{self, ConvGeometry, QuantizedOutput};
use crate::kernels::depthwise;
use crate::kernels::fully_connected::{self, FullyConnectedGeometry};
use proptest::collection::vec;
use proptest::prelude::*;
use std::vec::Vec;

/// The signature shared by CONV_2D and DEPTHWISE_CONV_2D bodies (fast and portable).
pub type ConvKernel =
    fn(&ConvGeometry, &QuantizedOutput<'_>, &[i8], &[i8], Option<&[i32]>, &mut [i8]);

/// The signature of FULLY_CONNECTED bodies (fast and portable).
pub type FcKernel =
    fn(&FullyConnectedGeometry, &QuantizedOutput<'_>, &[i8], &[i8], Option<&[i32]>, &mut [i8]);

/// One conv or depthwise op with its data.
#[derive(Debug, Clone)]
pub struct Case {
    pub g: ConvGeometry,
    pub input: Vec<i8>,
    pub filter: Vec<i8>,
    pub bias: Option<Vec<i32>>,
    pub requant: Vec<Requant>,
    pub zps: (i32, i32),
    pub clamp: ClampI8,
}

impl Case {
    pub fn q(&self) -> QuantizedOutput<'_> {
        QuantizedOutput {
            input_zero_point: self.zps.0,
            filter_zero_point: 0,
            output_zero_point: self.zps.1,
            requant: &self.requant,
            clamp: self.clamp,
        }
    }
    pub fn out_len(&self) -> usize {
        self.g.batch * self.g.out_h * self.g.out_w * self.g.out_c
    }
    /// `(kernel's output, other's output)` on this case.
    pub fn run_both(&self, kernel: ConvKernel, other: ConvKernel) -> (Vec<i8>, Vec<i8>) {
        let (mut got, mut want) = (
            std::vec![0i8; self.out_len()],
            std::vec![0i8; self.out_len()],
        );
        let (q, b) = (self.q(), self.bias.as_deref());
        kernel(&self.g, &q, &self.input, &self.filter, b, &mut got);
        other(&self.g, &q, &self.input, &self.filter, b, &mut want);
        (got, want)
    }
    /// `(kernel's output, conv::conv2d_i8_portable's output)`.
    pub fn run_conv(&self, kernel: ConvKernel) -> (Vec<i8>, Vec<i8>) {
        self.run_both(kernel, conv::conv2d_i8_portable)
    }
    /// `(kernel's output, depthwise::depthwise_conv2d_i8_portable's output)`.
    pub fn run_depthwise(&self, kernel: ConvKernel) -> (Vec<i8>, Vec<i8>) {
        self.run_both(kernel, depthwise::depthwise_conv2d_i8_portable)
    }
}

/// Weights: any int8, or symmetric ones (no `-128`, which the NEON bodies sum in pairs in
/// int16).
pub fn weights(len: usize) -> impl Strategy<Value = Vec<i8>> {
    prop_oneof![vec(any::<i8>(), len), vec(-127i8..=127, len)]
}

/// Data for conv (or depthwise, `dw`) geometry `g`: random input, [`weights`], bias or none,
/// per-tensor or per-channel requantization, zero points, clamp.
pub fn data(g: ConvGeometry, dw: bool) -> impl Strategy<Value = Case> {
    let filter_len = if dw {
        g.out_c * g.filter_h * g.filter_w
    } else {
        g.out_c * g.filter_h * g.filter_w * g.filter_in_c
    };
    (
        Just(g),
        vec(any::<i8>(), g.batch * g.in_h * g.in_w * g.in_c),
        weights(filter_len),
        proptest::option::of(vec(-100_000i32..=100_000, g.out_c)),
        requants(g.out_c),
        (zero_point(), zero_point()),
        clamp(),
    )
        .prop_map(|(g, input, filter, bias, requant, zps, clamp)| Case {
            g,
            input,
            filter,
            bias,
            requant,
            zps,
            clamp,
        })
}

/// Conv (or depthwise, `dw`) cases: input channels from 1 to 20 (multiples of 4 and not) and
/// multiples of 4 up to 72 (more than one 32-channel Cortex-M depthwise chunk, more than one
/// 64-channel NEON chunk), output channels 1 to 9 or 60 to 70 (conv), odd and even pixel and
/// channel counts, padding, stride, dilation.
pub fn case(dw: bool) -> impl Strategy<Value = Case> {
    (
        1usize..=2,
        axis(2),
        axis(2),
        prop_oneof![1usize..=20, (1usize..=18).prop_map(|c| 4 * c)],
        prop_oneof![1usize..=9, 60usize..=70],
    )
        .prop_flat_map(move |(batch, h, w, in_c, oc)| {
            let out_c = if dw { in_c } else { oc };
            let g = ConvGeometry {
                batch,
                in_h: h.input,
                in_w: w.input,
                in_c,
                out_h: h.output,
                out_w: w.output,
                out_c,
                filter_h: h.filter,
                filter_w: w.filter,
                filter_in_c: if dw { 1 } else { in_c },
                stride_h: h.stride,
                stride_w: w.stride,
                dilation_h: h.dilation,
                dilation_w: w.dilation,
                pad_top: h.pad,
                pad_left: w.pad,
                depth_multiplier: 1,
            };
            data(g, dw)
        })
}

/// One FULLY_CONNECTED op with its data.
#[derive(Debug, Clone)]
pub struct FcCase {
    pub g: FullyConnectedGeometry,
    pub input: Vec<i8>,
    pub weights: Vec<i8>,
    pub bias: Option<Vec<i32>>,
    pub requant: Vec<Requant>,
    /// Input, filter (0, the symmetric weights the fast paths take, or any) and output zero
    /// points.
    pub zps: (i32, i32, i32),
    pub clamp: ClampI8,
}

impl FcCase {
    pub fn q(&self) -> QuantizedOutput<'_> {
        QuantizedOutput {
            input_zero_point: self.zps.0,
            filter_zero_point: self.zps.1,
            output_zero_point: self.zps.2,
            requant: &self.requant,
            clamp: self.clamp,
        }
    }
    pub fn out_len(&self) -> usize {
        self.g.batch * self.g.out_features
    }
    /// `(kernel's output, fully_connected::fully_connected_i8_portable's output)`.
    pub fn run(&self, kernel: FcKernel) -> (Vec<i8>, Vec<i8>) {
        let (mut got, mut want) = (
            std::vec![0i8; self.out_len()],
            std::vec![0i8; self.out_len()],
        );
        let (q, b) = (self.q(), self.bias.as_deref());
        kernel(&self.g, &q, &self.input, &self.weights, b, &mut got);
        fully_connected::fully_connected_i8_portable(
            &self.g,
            &q,
            &self.input,
            &self.weights,
            b,
            &mut want,
        );
        (got, want)
    }
}

/// FULLY_CONNECTED cases: batch 1 to 3; 1 to 300 input features (often at most 70, or around
/// 256); 1 to 13 outputs or 62 to 70 (around a 64-channel NEON chunk); [`weights`], bias or
/// none, per-tensor or per-channel requantization, zero points (the filter's 0 or any), clamp.
pub fn fc_case() -> impl Strategy<Value = FcCase> {
    (
        1usize..=3,
        prop_oneof![1usize..=70, 1usize..=300, 250usize..=260],
        prop_oneof![1usize..=13, 62usize..=70],
    )
        .prop_flat_map(|(batch, n, o)| {
            (
                Just(FullyConnectedGeometry {
                    batch,
                    in_features: n,
                    out_features: o,
                }),
                vec(any::<i8>(), batch * n),
                weights(n * o),
                proptest::option::of(vec(-100_000i32..=100_000, o)),
                requants(o),
                (
                    zero_point(),
                    prop_oneof![Just(0i32), zero_point()],
                    zero_point(),
                ),
                clamp(),
            )
        })
        .prop_map(|(g, input, weights, bias, requant, zps, clamp)| FcCase {
            g,
            input,
            weights,
            bias,
            requant,
            zps,
            clamp,
        })
}

/// int32 accumulators for output-stage tests: any, the extremes, or moderate.
pub fn acc() -> impl Strategy<Value = i32> {
    prop_oneof![
        any::<i32>(),
        Just(i32::MIN),
        Just(i32::MAX),
        -1_000_000i32..=1_000_000
    ]
}

/// Multipliers at the edges of the output stage's arithmetic (ties and saturation).
pub const EDGE_MULTIPLIERS: [i32; 8] = [
    i32::MIN,
    i32::MAX,
    1 << 30,
    (1 << 30) + 1,
    -(1 << 30),
    0,
    1,
    -1,
];

/// Accumulators at the edges of the output stage's arithmetic (ties and saturation).
pub const EDGE_ACCS: [i32; 13] = [
    i32::MIN,
    i32::MIN + 1,
    -(1 << 30),
    -(1 << 30) - 1,
    -3,
    -2,
    -1,
    0,
    1,
    2,
    3,
    1 << 30,
    i32::MAX,
];
