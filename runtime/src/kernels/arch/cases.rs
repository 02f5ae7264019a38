//! Random conv and depthwise cases shared by the fast paths' bit-exactness tests (test builds
//! only).

extern crate std;

use crate::graph::{ClampI8, Requant};
use crate::kernels::conv::tests::{axis, clamp, requants, zero_point};
use crate::kernels::conv::{ConvGeometry, QuantizedOutput};
use proptest::collection::vec;
use proptest::prelude::*;
use std::vec::Vec;

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
}

/// Conv (or depthwise, `dw`) cases: channels from 1 to 16 (multiples of 4 and not) and
/// multiples of 4 up to 48 (more than one 32-channel depthwise chunk), odd and even pixel
/// and channel counts, padding, stride, dilation.
pub fn case(dw: bool) -> impl Strategy<Value = Case> {
    (
        1usize..=2,
        axis(2),
        axis(2),
        prop_oneof![1usize..=16, (1usize..=12).prop_map(|c| 4 * c)],
        1usize..=9,
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
            let filter_len = out_c * g.filter_h * g.filter_w * g.filter_in_c;
            (
                Just(g),
                vec(any::<i8>(), batch * h.input * w.input * in_c),
                vec(any::<i8>(), filter_len),
                proptest::option::of(vec(-100_000i32..=100_000, out_c)),
                requants(out_c),
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
        })
}
