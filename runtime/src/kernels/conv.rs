//! CONV_2D: NHWC activations, OHWI filters (`[out_c, filter_h, filter_w, in_c / groups]`),
//! optional bias, optional groups.
//!
//! The int8 body follows TFLM's reference `integer_ops/conv.h` exactly: for every output element
//! it sums `filter * (input - input_zero_point)` over the in-image taps (padding contributes
//! nothing), adds the bias, requantizes with [`multiply_by_quantized_multiplier`], adds the output
//! zero point and clamps. The float body runs the same loop nest in f32.
//!
//! Both bodies compute, once per output pixel, the range of filter rows and columns that land
//! inside the image, so the inner loops carry no bounds tests; the innermost loop is a dot product
//! over the contiguous input channels of one tap (NHWC input row against OHWI filter row).

use crate::graph::{Activation, ClampI8, Requant};
use crate::kernels::{activate, Float};
use crate::quant::multiply_by_quantized_multiplier;

/// Geometry shared by CONV_2D and DEPTHWISE_CONV_2D (all sizes in elements).
///
/// Output element `(b, oy, ox, oc)` reads input rows `oy * stride_h - pad_top + dilation_h * fy`
/// for `fy` in `0..filter_h` (columns likewise); rows and columns outside the input are implicit
/// padding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size (N of the input and the output).
    pub batch: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Input channels.
    pub in_c: usize,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
    /// Output channels.
    pub out_c: usize,
    /// Filter height.
    pub filter_h: usize,
    /// Filter width.
    pub filter_w: usize,
    /// Input channels seen by one filter: `in_c / groups` for CONV_2D, 1 for depthwise.
    pub filter_in_c: usize,
    /// Vertical stride (>= 1).
    pub stride_h: usize,
    /// Horizontal stride (>= 1).
    pub stride_w: usize,
    /// Vertical dilation (>= 1).
    pub dilation_h: usize,
    /// Horizontal dilation (>= 1).
    pub dilation_w: usize,
    /// Rows of implicit padding above the input.
    pub pad_top: usize,
    /// Columns of implicit padding left of the input.
    pub pad_left: usize,
    /// Output channels per input channel (depthwise only; 1 for CONV_2D).
    pub depth_multiplier: usize,
}

/// int8 quantization of a conv-like op's input/output.
#[derive(Clone, Copy, Debug)]
pub struct QuantizedOutput<'a> {
    /// Zero point of the input tensor.
    pub input_zero_point: i32,
    /// Zero point of the filter/weights: 0 for symmetric weights (required by CONV_2D and
    /// DEPTHWISE_CONV_2D, which ignore it); FULLY_CONNECTED may have one.
    pub filter_zero_point: i32,
    /// Zero point of the output tensor.
    pub output_zero_point: i32,
    /// Requantization from the accumulator to the output: 1 entry (per-tensor) or one per output
    /// channel (per-channel).
    pub requant: &'a [Requant],
    /// Output clamp (fused activation folded in).
    pub clamp: ClampI8,
}

/// The filter taps `k` in `0..filter` for which `origin + dilation * k` lies in `0..extent`, as a
/// `start..end` pair (empty when `start == end`). `dilation` must be at least 1.
#[inline(always)]
pub(crate) fn tap_range(
    origin: isize,
    dilation: usize,
    filter: usize,
    extent: usize,
) -> (usize, usize) {
    let d = dilation as isize;
    // First tap at or after row 0: ceil(-origin / d).
    let start = if origin >= 0 {
        0
    } else {
        ((-origin + d - 1) / d) as usize
    };
    // Last tap at or before row extent - 1: floor((extent - 1 - origin) / d).
    let room = extent as isize - 1 - origin;
    let end = if room < 0 {
        0
    } else {
        core::cmp::min(filter, (room / d) as usize + 1)
    };
    (core::cmp::min(start, end), end)
}

/// Requantizes one int8 accumulator: TFLM's `MultiplyByQuantizedMultiplier`, then the output zero
/// point, then the clamp. The zero-point add wraps (two's complement, as TFLM's `int32_t` add does
/// on every target) instead of panicking; valid models never come near `i32` limits here.
#[inline(always)]
pub(crate) fn requantize(acc: i32, r: Requant, output_zero_point: i32, clamp: ClampI8) -> i8 {
    let v = multiply_by_quantized_multiplier(acc, r.multiplier, r.shift)
        .wrapping_add(output_zero_point);
    // max-then-min as TFLM does (never panics, unlike `clamp`, even on a reversed range).
    v.max(i32::from(clamp.min)).min(i32::from(clamp.max)) as i8
}

/// Checks the slice lengths against the geometry (debug builds only).
#[inline(always)]
fn debug_check<A, F, B, O>(
    g: &ConvGeometry,
    input: &[A],
    filter: &[F],
    bias: Option<&[B]>,
    output: &[O],
) {
    debug_assert!(g.stride_h >= 1 && g.stride_w >= 1 && g.dilation_h >= 1 && g.dilation_w >= 1);
    debug_assert!(g.filter_in_c >= 1 && g.in_c.is_multiple_of(g.filter_in_c));
    debug_assert!(g.out_c.is_multiple_of(g.in_c / g.filter_in_c));
    debug_assert_eq!(input.len(), g.batch * g.in_h * g.in_w * g.in_c);
    debug_assert_eq!(
        filter.len(),
        g.out_c * g.filter_h * g.filter_w * g.filter_in_c
    );
    debug_assert!(bias.is_none_or(|b| b.len() == g.out_c));
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * g.out_c);
}

/// int8 CONV_2D (TFLM reference arithmetic, bit-exact).
///
/// `input` is `[batch, in_h, in_w, in_c]`, `filter` `[out_c, filter_h, filter_w, filter_in_c]`
/// (symmetric: `q.filter_zero_point` must be 0 and is ignored), `bias` `[out_c]`, `output`
/// `[batch, out_h, out_w, out_c]`. With `groups = in_c / filter_in_c`, output channel `oc` belongs
/// to group `oc / (out_c / groups)` and reads input channels `group * filter_in_c ..` `+ filter_in_c`.
///
/// Accumulator bound: each term is `filter * (input - input_zero_point)` with `|filter| <= 128`
/// and `|input - input_zero_point| <= 255`, so `|acc| <= 32640 * filter_h * filter_w *
/// filter_in_c`, which fits `i32` for up to 65 793 taps per output. Beyond that (and for the bias
/// add) the sums wrap, as TFLM's do, rather than panic.
///
/// On Cortex-M4/M7 (the `dsp` target feature) this runs the DSP fast path of
/// [`super::arch::cortex_m`], which is bit-exact with the portable body; elsewhere, or with the
/// `portable-kernels` feature, the portable body.
pub fn conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    #[cfg(kiln_dsp_kernels)]
    super::arch::cortex_m::conv2d_i8(g, q, input, filter, bias, output);
    #[cfg(kiln_neon_kernels)]
    super::arch::aarch64::conv2d_i8(g, q, input, filter, bias, output);
    #[cfg(kiln_x86_kernels)]
    super::arch::x86_64::conv2d_i8(g, q, input, filter, bias, output);
    #[cfg(not(any(kiln_dsp_kernels, kiln_neon_kernels, kiln_x86_kernels)))]
    conv2d_i8_portable(g, q, input, filter, bias, output);
}

/// The portable body of [`conv2d_i8`]: the reference loop nest above, on every target. Fast
/// paths are tested byte for byte against it.
pub fn conv2d_i8_portable(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    debug_check(g, input, filter, bias, output);
    debug_assert!(q.requant.len() == 1 || q.requant.len() == g.out_c);
    debug_assert_eq!(q.filter_zero_point, 0);
    let input_offset = -q.input_zero_point;
    let per_channel = q.requant.len() > 1;
    let fic = g.filter_in_c;
    let out_per_group = g.out_c / (g.in_c / fic);
    let filter_oc_stride = g.filter_h * g.filter_w * fic;

    let mut out_idx = 0;
    for b in 0..g.batch {
        for oy in 0..g.out_h {
            let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
            let (fy0, fy1) = tap_range(in_y0, g.dilation_h, g.filter_h, g.in_h);
            for ox in 0..g.out_w {
                let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                let (fx0, fx1) = tap_range(in_x0, g.dilation_w, g.filter_w, g.in_w);
                for oc in 0..g.out_c {
                    let in_c0 = (oc / out_per_group) * fic;
                    let filter_oc = &filter[oc * filter_oc_stride..][..filter_oc_stride];
                    let mut acc: i32 = 0;
                    for fy in fy0..fy1 {
                        let iy = (in_y0 + (g.dilation_h * fy) as isize) as usize;
                        let in_row = (b * g.in_h + iy) * g.in_w;
                        for fx in fx0..fx1 {
                            let ix = (in_x0 + (g.dilation_w * fx) as isize) as usize;
                            let x = &input[(in_row + ix) * g.in_c + in_c0..][..fic];
                            let w = &filter_oc[(fy * g.filter_w + fx) * fic..][..fic];
                            let dot = x.iter().zip(w).fold(0i32, |s, (&x, &w)| {
                                s.wrapping_add((i32::from(x) + input_offset) * i32::from(w))
                            });
                            acc = acc.wrapping_add(dot);
                        }
                    }
                    if let Some(bias) = bias {
                        acc = acc.wrapping_add(bias[oc]);
                    }
                    let r = if per_channel {
                        q.requant[oc]
                    } else {
                        q.requant[0]
                    };
                    output[out_idx] = requantize(acc, r, q.output_zero_point, q.clamp);
                    out_idx += 1;
                }
            }
        }
    }
}

/// Float CONV_2D (f32 or f16 storage, f32 arithmetic): the loop nest of [`conv2d_i8`] with
/// `sum(input * filter) + bias`, then the fused `activation`. Only the final store rounds (to f16
/// for f16 storage).
pub fn conv2d_float<T: Float>(
    g: &ConvGeometry,
    activation: Activation,
    input: &[T],
    filter: &[T],
    bias: Option<&[T]>,
    output: &mut [T],
) {
    debug_check(g, input, filter, bias, output);
    let fic = g.filter_in_c;
    let out_per_group = g.out_c / (g.in_c / fic);
    let filter_oc_stride = g.filter_h * g.filter_w * fic;

    let mut out_idx = 0;
    for b in 0..g.batch {
        for oy in 0..g.out_h {
            let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
            let (fy0, fy1) = tap_range(in_y0, g.dilation_h, g.filter_h, g.in_h);
            for ox in 0..g.out_w {
                let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                let (fx0, fx1) = tap_range(in_x0, g.dilation_w, g.filter_w, g.in_w);
                for oc in 0..g.out_c {
                    let in_c0 = (oc / out_per_group) * fic;
                    let filter_oc = &filter[oc * filter_oc_stride..][..filter_oc_stride];
                    let mut acc = 0.0f32;
                    for fy in fy0..fy1 {
                        let iy = (in_y0 + (g.dilation_h * fy) as isize) as usize;
                        let in_row = (b * g.in_h + iy) * g.in_w;
                        for fx in fx0..fx1 {
                            let ix = (in_x0 + (g.dilation_w * fx) as isize) as usize;
                            let x = &input[(in_row + ix) * g.in_c + in_c0..][..fic];
                            let w = &filter_oc[(fy * g.filter_w + fx) * fic..][..fic];
                            for (&x, &w) in x.iter().zip(w) {
                                acc += x.to_f32() * w.to_f32();
                            }
                        }
                    }
                    if let Some(bias) = bias {
                        acc += bias[oc].to_f32();
                    }
                    output[out_idx] = T::from_f32(activate(acc, activation));
                    out_idx += 1;
                }
            }
        }
    }
}

/// Multiply-accumulates of one CONV_2D invocation (for reports): every filter tap of every output
/// element, padding taps included (`batch * out_h * out_w * out_c * filter_h * filter_w *
/// filter_in_c`), saturating at `u64::MAX`.
pub fn conv2d_macs(g: &ConvGeometry) -> u64 {
    [
        g.batch,
        g.out_h,
        g.out_w,
        g.out_c,
        g.filter_h,
        g.filter_w,
        g.filter_in_c,
    ]
    .iter()
    .fold(1u64, |m, &d| m.saturating_mul(d as u64))
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;

    use super::*;
    use half::f16;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// One spatial axis of a generated test case.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Axis {
        pub input: usize,
        pub filter: usize,
        pub stride: usize,
        pub dilation: usize,
        pub pad: usize,
        pub output: usize,
    }

    /// An axis with SAME-style padding on both sides (up to `extent - 1` each, so taps fall off
    /// both edges), stride 1-2, dilation 1-2 and an output size that covers the padded input.
    pub(crate) fn axis(max_dilation: usize) -> impl Strategy<Value = Axis> {
        (
            1usize..=6,
            1usize..=3,
            1usize..=2,
            1usize..=max_dilation,
            0usize..=4,
            0usize..=4,
        )
            .prop_map(|(input, filter, stride, dilation, pad_a, pad_b)| {
                let extent = (filter - 1) * dilation + 1;
                let pad = pad_a.min(extent - 1);
                let pad_b = pad_b.min(extent - 1);
                let total = pad + input + pad_b;
                let output = if total < extent {
                    1
                } else {
                    (total - extent) / stride + 1
                };
                Axis {
                    input,
                    filter,
                    stride,
                    dilation,
                    pad,
                    output,
                }
            })
    }

    /// A valid TFLite requantization: multiplier in `[2^30, 2^31)`, shift in `[-12, 2]` (shift 2
    /// with a large multiplier saturates most outputs; shift -12 keeps them near the zero point).
    pub(crate) fn requant() -> impl Strategy<Value = Requant> {
        ((1i32 << 30)..=i32::MAX, -12i32..=2)
            .prop_map(|(multiplier, shift)| Requant { multiplier, shift })
    }

    /// Per-tensor (1 entry) or per-channel (`channels` entries) requantization.
    pub(crate) fn requants(channels: usize) -> impl Strategy<Value = Vec<Requant>> {
        any::<bool>().prop_flat_map(move |per_channel| {
            vec(requant(), if per_channel { channels } else { 1 })
        })
    }

    /// A zero point, often at the extremes.
    pub(crate) fn zero_point() -> impl Strategy<Value = i32> {
        prop_oneof![Just(-128i32), Just(127i32), -128i32..=127]
    }

    /// The full int8 range or a narrower clamp.
    pub(crate) fn clamp() -> impl Strategy<Value = ClampI8> {
        prop_oneof![
            Just(ClampI8 {
                min: -128,
                max: 127
            }),
            (-128i8..=0, 0i8..=127).prop_map(|(min, max)| ClampI8 { min, max }),
        ]
    }

    /// Any fused activation.
    pub(crate) fn activation() -> impl Strategy<Value = Activation> {
        prop_oneof![
            Just(Activation::None),
            Just(Activation::Relu),
            Just(Activation::ReluN1To1),
            Just(Activation::Relu6)
        ]
    }

    /// Float test data: multiples of 1/64 in [-2, 2].
    pub(crate) fn float_data(len: usize) -> impl Strategy<Value = Vec<f32>> {
        vec((-128i32..=128).prop_map(|v| v as f32 / 64.0), len)
    }

    /// The spec'd int8 output stage, written out in i64: exact sum, bias, then the crate's
    /// requantization, zero point and clamp.
    pub(crate) fn reference_output(acc: i64, r: Requant, zp: i32, clamp: ClampI8) -> i8 {
        let acc = i32::try_from(acc).expect("test accumulator fits i32");
        let v =
            i64::from(multiply_by_quantized_multiplier(acc, r.multiplier, r.shift)) + i64::from(zp);
        v.max(i64::from(clamp.min)).min(i64::from(clamp.max)) as i8
    }

    /// f64 activation for float references.
    pub(crate) fn activate_f64(v: f64, act: Activation) -> f64 {
        match act {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::ReluN1To1 => v.clamp(-1.0, 1.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
        }
    }

    /// f32 result vs f64 reference: 1e-4 relative, with an absolute floor of 1e-4 (values near
    /// zero after cancellation).
    pub(crate) fn assert_close_f32(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-4 * w.abs().max(1.0),
                "element {i}: got {g}, want {w}"
            );
        }
    }

    /// f16 kernel vs the f32 kernel run on the same (f16-exact) inputs. The f16 kernel widens
    /// exactly and does the f32 kernel's arithmetic, so only its final store rounds: at most half
    /// an f16 ulp, i.e. 2^-11 relative (plus 2^-25 absolute in the subnormal range). We allow
    /// 1e-3 relative + 1e-6 absolute.
    pub(crate) fn assert_close_f16(got: &[f16], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let g = g.to_f32();
            assert!(
                (g - w).abs() <= 1e-3 * w.abs() + 1e-6,
                "element {i}: got {g}, want {w}"
            );
        }
    }

    pub(crate) fn to_f16(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    pub(crate) fn from_f16(v: &[f16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    fn conv_geometry() -> impl Strategy<Value = ConvGeometry> {
        (
            1usize..=2,
            axis(2),
            axis(2),
            1usize..=3,
            1usize..=3,
            1usize..=3,
        )
            .prop_map(
                |(batch, h, w, groups, filter_in_c, out_per_group)| ConvGeometry {
                    batch,
                    in_h: h.input,
                    in_w: w.input,
                    in_c: groups * filter_in_c,
                    out_h: h.output,
                    out_w: w.output,
                    out_c: groups * out_per_group,
                    filter_h: h.filter,
                    filter_w: w.filter,
                    filter_in_c,
                    stride_h: h.stride,
                    stride_w: w.stride,
                    dilation_h: h.dilation,
                    dilation_w: w.dilation,
                    pad_top: h.pad,
                    pad_left: w.pad,
                    depth_multiplier: 1,
                },
            )
    }

    fn input_len(g: &ConvGeometry) -> usize {
        g.batch * g.in_h * g.in_w * g.in_c
    }

    fn output_len(g: &ConvGeometry) -> usize {
        g.batch * g.out_h * g.out_w * g.out_c
    }

    /// Padded extent of one axis: every position `o * stride + k * dilation` a window touches,
    /// and the whole input after `pad` leading cells.
    pub(crate) fn padded_extent(
        input: usize,
        pad: usize,
        out: usize,
        stride: usize,
        filter: usize,
        dil: usize,
    ) -> usize {
        core::cmp::max(pad + input, (out - 1) * stride + (filter - 1) * dil + 1)
    }

    /// Materializes the input with explicit padding (`fill` in every padded cell):
    /// `[batch, ph, pw, in_c]`, returned with `(ph, pw)`.
    pub(crate) fn materialize_padded<T: Copy>(
        g: &ConvGeometry,
        input: &[T],
        fill: T,
    ) -> (Vec<T>, usize, usize) {
        let ph = padded_extent(
            g.in_h,
            g.pad_top,
            g.out_h,
            g.stride_h,
            g.filter_h,
            g.dilation_h,
        );
        let pw = padded_extent(
            g.in_w,
            g.pad_left,
            g.out_w,
            g.stride_w,
            g.filter_w,
            g.dilation_w,
        );
        let mut padded = std::vec![fill; g.batch * ph * pw * g.in_c];
        for b in 0..g.batch {
            for y in 0..g.in_h {
                for x in 0..g.in_w {
                    for c in 0..g.in_c {
                        padded[((b * ph + y + g.pad_top) * pw + x + g.pad_left) * g.in_c + c] =
                            input[((b * g.in_h + y) * g.in_w + x) * g.in_c + c];
                    }
                }
            }
        }
        (padded, ph, pw)
    }

    /// Naive grouped conv over the zero-point-padded input, in i64 (padding cells hold the input
    /// zero point, so they contribute `filter * 0`).
    fn reference_conv_i8(
        g: &ConvGeometry,
        q: &QuantizedOutput<'_>,
        input: &[i8],
        filter: &[i8],
        bias: Option<&[i32]>,
    ) -> Vec<i8> {
        let zp = q.input_zero_point;
        let widened: Vec<i32> = input.iter().map(|&v| i32::from(v)).collect();
        let (padded, ph, pw) = materialize_padded(g, &widened, zp);
        let groups = g.in_c / g.filter_in_c;
        let per_group = g.out_c / groups;
        let mut out = Vec::new();
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                for ox in 0..g.out_w {
                    for oc in 0..g.out_c {
                        let group = oc / per_group;
                        let mut acc: i64 = 0;
                        for fy in 0..g.filter_h {
                            for fx in 0..g.filter_w {
                                for k in 0..g.filter_in_c {
                                    let py = oy * g.stride_h + fy * g.dilation_h;
                                    let px = ox * g.stride_w + fx * g.dilation_w;
                                    let v = padded[((b * ph + py) * pw + px) * g.in_c
                                        + group * g.filter_in_c
                                        + k];
                                    let w = filter[((oc * g.filter_h + fy) * g.filter_w + fx)
                                        * g.filter_in_c
                                        + k];
                                    acc += i64::from(w) * i64::from(v - zp);
                                }
                            }
                        }
                        acc += bias.map_or(0, |b| i64::from(b[oc]));
                        let r = q.requant[if q.requant.len() == 1 { 0 } else { oc }];
                        out.push(reference_output(acc, r, q.output_zero_point, q.clamp));
                    }
                }
            }
        }
        out
    }

    /// Naive float conv in f64 with per-tap bounds tests in signed arithmetic.
    fn reference_conv_f64(
        g: &ConvGeometry,
        act: Activation,
        input: &[f32],
        filter: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let per_group = g.out_c / (g.in_c / g.filter_in_c);
        let mut out = Vec::new();
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                for ox in 0..g.out_w {
                    for oc in 0..g.out_c {
                        let mut acc = 0.0f64;
                        for fy in 0..g.filter_h {
                            for fx in 0..g.filter_w {
                                let iy =
                                    (oy * g.stride_h + fy * g.dilation_h) as i64 - g.pad_top as i64;
                                let ix = (ox * g.stride_w + fx * g.dilation_w) as i64
                                    - g.pad_left as i64;
                                if iy < 0 || ix < 0 || iy >= g.in_h as i64 || ix >= g.in_w as i64 {
                                    continue;
                                }
                                for k in 0..g.filter_in_c {
                                    let ic = (oc / per_group) * g.filter_in_c + k;
                                    let v = input[((b * g.in_h + iy as usize) * g.in_w
                                        + ix as usize)
                                        * g.in_c
                                        + ic];
                                    let w = filter[((oc * g.filter_h + fy) * g.filter_w + fx)
                                        * g.filter_in_c
                                        + k];
                                    acc += f64::from(v) * f64::from(w);
                                }
                            }
                        }
                        acc += bias.map_or(0.0, |b| f64::from(b[oc]));
                        out.push(activate_f64(acc, act));
                    }
                }
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    struct I8Case {
        g: ConvGeometry,
        input: Vec<i8>,
        filter: Vec<i8>,
        bias: Option<Vec<i32>>,
        requant: Vec<Requant>,
        input_zp: i32,
        output_zp: i32,
        clamp: ClampI8,
    }

    fn i8_case() -> impl Strategy<Value = I8Case> {
        conv_geometry().prop_flat_map(|g| {
            let filter_len = g.out_c * g.filter_h * g.filter_w * g.filter_in_c;
            (
                Just(g),
                vec(any::<i8>(), input_len(&g)),
                vec(any::<i8>(), filter_len),
                proptest::option::of(vec(-100_000i32..=100_000, g.out_c)),
                requants(g.out_c),
                zero_point(),
                zero_point(),
                clamp(),
            )
                .prop_map(
                    |(g, input, filter, bias, requant, input_zp, output_zp, clamp)| I8Case {
                        g,
                        input,
                        filter,
                        bias,
                        requant,
                        input_zp,
                        output_zp,
                        clamp,
                    },
                )
        })
    }

    #[derive(Debug, Clone)]
    struct FloatCase {
        g: ConvGeometry,
        act: Activation,
        input: Vec<f32>,
        filter: Vec<f32>,
        bias: Option<Vec<f32>>,
    }

    fn float_case() -> impl Strategy<Value = FloatCase> {
        (conv_geometry(), activation()).prop_flat_map(|(g, act)| {
            let filter_len = g.out_c * g.filter_h * g.filter_w * g.filter_in_c;
            (
                Just(g),
                Just(act),
                float_data(input_len(&g)),
                float_data(filter_len),
                proptest::option::of(float_data(g.out_c)),
            )
                .prop_map(|(g, act, input, filter, bias)| FloatCase {
                    g,
                    act,
                    input,
                    filter,
                    bias,
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn conv2d_i8_matches_padded_reference(c in i8_case()) {
            let q = QuantizedOutput {
                input_zero_point: c.input_zp,
                filter_zero_point: 0,
                output_zero_point: c.output_zp,
                requant: &c.requant,
                clamp: c.clamp,
            };
            let mut out = std::vec![0i8; output_len(&c.g)];
            conv2d_i8(&c.g, &q, &c.input, &c.filter, c.bias.as_deref(), &mut out);
            let want = reference_conv_i8(&c.g, &q, &c.input, &c.filter, c.bias.as_deref());
            prop_assert_eq!(out, want);
        }

        #[test]
        fn conv2d_f32_matches_f64_reference(c in float_case()) {
            let mut out = std::vec![0f32; output_len(&c.g)];
            conv2d_float(&c.g, c.act, &c.input, &c.filter, c.bias.as_deref(), &mut out);
            assert_close_f32(&out, &reference_conv_f64(&c.g, c.act, &c.input, &c.filter, c.bias.as_deref()));
        }

        #[test]
        fn conv2d_f16_matches_f32_kernel(c in float_case()) {
            let (input, filter) = (to_f16(&c.input), to_f16(&c.filter));
            let bias = c.bias.as_deref().map(to_f16);
            let mut out16 = std::vec![f16::ZERO; output_len(&c.g)];
            conv2d_float(&c.g, c.act, &input, &filter, bias.as_deref(), &mut out16);
            let bias32 = bias.as_deref().map(from_f16);
            let mut out32 = std::vec![0f32; output_len(&c.g)];
            conv2d_float(&c.g, c.act, &from_f16(&input), &from_f16(&filter), bias32.as_deref(), &mut out32);
            assert_close_f16(&out16, &out32);
        }
    }

    #[test]
    fn tap_range_clips_both_edges() {
        // origin -3, dilation 2, 4 taps over 0..4: rows -3, -1, 1, 3 -> taps 2..4
        assert_eq!(tap_range(-3, 2, 4, 4), (2, 4));
        // origin 2, dilation 1, 3 taps over 0..3: rows 2, 3, 4 -> tap 0 only
        assert_eq!(tap_range(2, 1, 3, 3), (0, 1));
        // window entirely below / above the image
        assert_eq!(tap_range(5, 1, 3, 3), (0, 0));
        let (s, e) = tap_range(-10, 1, 3, 3);
        assert!(s >= e);
    }

    #[test]
    fn conv2d_i8_hand_example() {
        // 1x2x2x1 input, one 2x2 filter, VALID: acc = sum(w * (x - zp)).
        let g = ConvGeometry {
            batch: 1,
            in_h: 2,
            in_w: 2,
            in_c: 1,
            out_h: 1,
            out_w: 1,
            out_c: 1,
            filter_h: 2,
            filter_w: 2,
            filter_in_c: 1,
            stride_h: 1,
            stride_w: 1,
            dilation_h: 1,
            dilation_w: 1,
            pad_top: 0,
            pad_left: 0,
            depth_multiplier: 1,
        };
        // multiplier 2^30 with shift 0 is x 0.5
        let requant = [Requant {
            multiplier: 1 << 30,
            shift: 0,
        }];
        let q = QuantizedOutput {
            input_zero_point: -1,
            filter_zero_point: 0,
            output_zero_point: 3,
            requant: &requant,
            clamp: ClampI8::default(),
        };
        let mut out = [0i8];
        // (1+1)*1 + (2+1)*2 + (3+1)*3 + (4+1)*4 = 2 + 6 + 12 + 20 = 40; + bias 10 = 50; * 0.5 = 25; + 3
        conv2d_i8(&g, &q, &[1, 2, 3, 4], &[1, 2, 3, 4], Some(&[10]), &mut out);
        assert_eq!(out, [28]);
        assert_eq!(conv2d_macs(&g), 4);
    }
}
