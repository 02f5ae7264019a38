//! Checks the int8 kernels' fast paths on the real core: on a Cortex-M4/M7 build
//! (`thumbv7em-none-eabihf`) the public `conv2d_i8`, `depthwise_conv2d_i8` and
//! `fully_connected_i8` run the DSP bodies of `kernels::arch::cortex_m`; each is compared byte for
//! byte with its portable body (`*_portable`) on seeded pseudo-random cases (geometry, padding,
//! stride, dilation, channel counts that are and are not multiples of 4, odd pixel and channel
//! counts, zero points at the extremes, per-tensor and per-channel requantization, clamps), plus
//! fixed shapes of the MLPerf Tiny models (1x1 over 64 and 256 channels, 3x3 over 64, the first
//! layers' 3-channel and 1-channel patches, a patch too large for the fast path). int8 ADD and
//! SUB (`binary::add_i8` / `sub_i8`, the DSP table body) are checked against TFLM's reference
//! arithmetic written out here.
//!
//! Run under QEMU (`scripts/test.sh` does): exits (semihosting) with status 0 when every case
//! matched, after printing how many ran; on a mismatch it prints the case and exits with 1.
#![no_std]
#![no_main]

use core::panic::PanicInfo;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use kiln_runtime::graph::{ClampI8, Requant};
use kiln_runtime::kernels::arch::CORTEX_M_DSP;
use kiln_runtime::kernels::conv::{self, ConvGeometry, QuantizedOutput};
use kiln_runtime::kernels::depthwise;
use kiln_runtime::kernels::fully_connected::{self, FullyConnectedGeometry};
use kiln_runtime::kernels::{binary, quantize};
use kiln_runtime::quant::multiply_by_quantized_multiplier_smaller_than_one as rescale;

/// Seeded cases per kernel.
const CASES: usize = 2000;
/// Buffer capacities (bytes / entries), enough for every generated and fixed case.
const MAX_IN: usize = 16 * 1024;
const MAX_FILTER: usize = 72 * 1024;
const MAX_OUT: usize = 4 * 1024;
const MAX_C: usize = 256;

/// xorshift32: a fixed seed gives the same cases on every run.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
    /// Uniform in `lo..=hi` (small ranges; modulo bias is irrelevant here).
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + i64::from(self.next()) % (hi - lo + 1)
    }
    fn usize(&mut self, lo: usize, hi: usize) -> usize {
        self.range(lo as i64, hi as i64) as usize
    }
    fn fill(&mut self, v: &mut [i8]) {
        for x in v {
            *x = self.next() as i8;
        }
    }
    fn zero_point(&mut self) -> i32 {
        match self.next() % 4 {
            0 => -128,
            1 => 127,
            _ => self.range(-128, 127) as i32,
        }
    }
}

/// Everything one case needs besides its geometry.
struct Buffers {
    input: [i8; MAX_IN],
    filter: [i8; MAX_FILTER],
    bias: [i32; MAX_C],
    requant: [Requant; MAX_C],
    fast: [i8; MAX_OUT],
    portable: [i8; MAX_OUT],
}

/// Random quantization for `channels` outputs; returns (requant entries, zero points, clamp,
/// bias present).
fn quant(rng: &mut Rng, b: &mut Buffers, channels: usize) -> (usize, i32, i32, ClampI8, bool) {
    let n = if rng.next().is_multiple_of(2) {
        1
    } else {
        channels
    };
    for r in &mut b.requant[..n] {
        *r = Requant {
            multiplier: rng.range(1 << 30, i64::from(i32::MAX)) as i32,
            shift: rng.range(-12, 2) as i32,
        };
    }
    for v in &mut b.bias[..channels] {
        *v = rng.range(-100_000, 100_000) as i32;
    }
    let clamp = if rng.next().is_multiple_of(2) {
        ClampI8 {
            min: -128,
            max: 127,
        }
    } else {
        ClampI8 {
            min: rng.range(-128, 0) as i8,
            max: rng.range(0, 127) as i8,
        }
    };
    (
        n,
        rng.zero_point(),
        rng.zero_point(),
        clamp,
        !rng.next().is_multiple_of(4),
    )
}

/// One axis: (input, filter, stride, dilation, pad, output), padding up to `extent - 1` per side.
fn axis(
    rng: &mut Rng,
    max_in: usize,
    max_filter: usize,
) -> (usize, usize, usize, usize, usize, usize) {
    let input = rng.usize(1, max_in);
    let filter = rng.usize(1, max_filter);
    let stride = rng.usize(1, 2);
    let dilation = rng.usize(1, 2);
    let extent = (filter - 1) * dilation + 1;
    let pad = rng.usize(0, extent - 1);
    let pad_b = rng.usize(0, extent - 1);
    let padded = pad + input + pad_b;
    let output = if padded >= extent {
        (padded - extent) / stride + 1
    } else {
        1
    };
    (input, filter, stride, dilation, pad, output)
}

fn random_geometry(rng: &mut Rng, depthwise: bool) -> ConvGeometry {
    let (ih, fh, sh, dh, ph, oh) = axis(rng, 8, 3);
    let (iw, fw, sw, dw, pw, ow) = axis(rng, 8, 3);
    let in_c = match rng.next() % 3 {
        0 => rng.usize(1, 16),
        1 => 4 * rng.usize(1, 8),
        _ => 4 * rng.usize(1, 3),
    };
    let out_c = if depthwise { in_c } else { rng.usize(1, 17) };
    ConvGeometry {
        batch: rng.usize(1, 2),
        in_h: ih,
        in_w: iw,
        in_c,
        out_h: oh,
        out_w: ow,
        out_c,
        filter_h: fh,
        filter_w: fw,
        filter_in_c: if depthwise { 1 } else { in_c },
        stride_h: sh,
        stride_w: sw,
        dilation_h: dh,
        dilation_w: dw,
        pad_top: ph,
        pad_left: pw,
        depth_multiplier: 1,
    }
}

/// A fixed shape (square, SAME-style padding for odd filters, no dilation).
fn fixed(
    hw: usize,
    in_c: usize,
    out_c: usize,
    f: usize,
    stride: usize,
    depthwise: bool,
) -> ConvGeometry {
    let out = hw.div_ceil(stride);
    ConvGeometry {
        batch: 1,
        in_h: hw,
        in_w: hw,
        in_c,
        out_h: out,
        out_w: out,
        out_c,
        filter_h: f,
        filter_w: f,
        filter_in_c: if depthwise { 1 } else { in_c },
        stride_h: stride,
        stride_w: stride,
        dilation_h: 1,
        dilation_w: 1,
        pad_top: (f - 1) / 2,
        pad_left: (f - 1) / 2,
        depth_multiplier: 1,
    }
}

fn fail(kind: &str, case: usize, g: &ConvGeometry) -> ! {
    hprintln!(
        "kiln-kernel-check: FAILED: {} case {} differs: {:?}",
        kind,
        case,
        g
    );
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

/// Runs one conv or depthwise case through both bodies; false if they differ.
fn conv_case(rng: &mut Rng, b: &mut Buffers, g: &ConvGeometry, depthwise: bool) -> bool {
    let in_len = g.batch * g.in_h * g.in_w * g.in_c;
    let f_len = g.out_c * g.filter_h * g.filter_w * g.filter_in_c;
    let out_len = g.batch * g.out_h * g.out_w * g.out_c;
    if in_len > MAX_IN || f_len > MAX_FILTER || out_len > MAX_OUT || g.out_c > MAX_C {
        hprintln!("kiln-kernel-check: case too large for the buffers: {:?}", g);
        debug::exit(debug::EXIT_FAILURE);
    }
    rng.fill(&mut b.input[..in_len]);
    rng.fill(&mut b.filter[..f_len]);
    let (n, zp_in, zp_out, clamp, has_bias) = quant(rng, b, g.out_c);
    let q = QuantizedOutput {
        input_zero_point: zp_in,
        filter_zero_point: 0,
        output_zero_point: zp_out,
        requant: &b.requant[..n],
        clamp,
    };
    let bias = if has_bias {
        Some(&b.bias[..g.out_c])
    } else {
        None
    };
    let (input, filter) = (&b.input[..in_len], &b.filter[..f_len]);
    if depthwise {
        depthwise::depthwise_conv2d_i8(g, &q, input, filter, bias, &mut b.fast[..out_len]);
        depthwise::depthwise_conv2d_i8_portable(
            g,
            &q,
            input,
            filter,
            bias,
            &mut b.portable[..out_len],
        );
    } else {
        conv::conv2d_i8(g, &q, input, filter, bias, &mut b.fast[..out_len]);
        conv::conv2d_i8_portable(g, &q, input, filter, bias, &mut b.portable[..out_len]);
    }
    b.fast[..out_len] == b.portable[..out_len]
}

fn fc_case(rng: &mut Rng, b: &mut Buffers, g: &FullyConnectedGeometry) -> bool {
    let (in_len, w_len, out_len) = (
        g.batch * g.in_features,
        g.in_features * g.out_features,
        g.batch * g.out_features,
    );
    rng.fill(&mut b.input[..in_len]);
    rng.fill(&mut b.filter[..w_len]);
    let (n, zp_in, zp_out, clamp, has_bias) = quant(rng, b, g.out_features);
    let q = QuantizedOutput {
        input_zero_point: zp_in,
        filter_zero_point: if rng.next().is_multiple_of(4) {
            rng.zero_point()
        } else {
            0
        },
        output_zero_point: zp_out,
        requant: &b.requant[..n],
        clamp,
    };
    let bias = if has_bias {
        Some(&b.bias[..g.out_features])
    } else {
        None
    };
    let (input, w) = (&b.input[..in_len], &b.filter[..w_len]);
    fully_connected::fully_connected_i8(g, &q, input, w, bias, &mut b.fast[..out_len]);
    fully_connected::fully_connected_i8_portable(g, &q, input, w, bias, &mut b.portable[..out_len]);
    b.fast[..out_len] == b.portable[..out_len]
}

static mut BUFFERS: Buffers = Buffers {
    input: [0; MAX_IN],
    filter: [0; MAX_FILTER],
    bias: [0; MAX_C],
    requant: [Requant {
        multiplier: 0,
        shift: 0,
    }; MAX_C],
    fast: [0; MAX_OUT],
    portable: [0; MAX_OUT],
};

/// Runs one int8 ADD or SUB (`sub`) of two same-shaped tensors through `binary::add_i8` /
/// `sub_i8` (the DSP body in this build) and TFLM's reference arithmetic written out here;
/// false if any byte differs.
fn add_case(rng: &mut Rng, b: &mut Buffers, sub: bool) -> bool {
    let n = rng.usize(1, MAX_OUT);
    rng.fill(&mut b.input[..n]);
    rng.fill(&mut b.filter[..n]);
    // Input scales 2^-12 .. 2^2, the output's 1/8 to 64 times the larger.
    let scale = |rng: &mut Rng, lo: i64, hi: i64| {
        let e = rng.range(lo, hi) as i32;
        let m = 1.0 + rng.range(0, 999) as f32 / 1000.0;
        if e >= 0 {
            m * (1u32 << e) as f32
        } else {
            m / (1u32 << -e) as f32
        }
    };
    let (s0, s1) = (scale(rng, -12, 2), scale(rng, -12, 2));
    let so = s0.max(s1) * scale(rng, -3, 5);
    let (_, zp0, zp1, clamp, _) = quant(rng, b, 1);
    let zpo = rng.zero_point();
    let p = quantize::add_params(s0, s1, so, clamp);
    let Some(shapes) = binary::BroadcastShapes::new(&[n], &[n], &[n]) else {
        return false;
    };
    let (x, y) = (&b.input[..n], &b.filter[..n]);
    if sub {
        binary::sub_i8(&shapes, &p, [zp0, zp1, zpo], x, y, &mut b.fast[..n]);
    } else {
        binary::add_i8(&shapes, &p, [zp0, zp1, zpo], x, y, &mut b.fast[..n]);
    }
    let scaled = |v: i8, zp: i32, r: Requant| {
        let v = (i32::from(v) - zp).wrapping_mul(1 << p.left_shift);
        rescale(v, r.multiplier, r.shift)
    };
    x.iter().zip(y).zip(&b.fast[..n]).all(|((&x, &y), &got)| {
        let (x, y) = (scaled(x, zp0, p.input0), scaled(y, zp1, p.input1));
        let raw = if sub {
            x.wrapping_sub(y)
        } else {
            x.wrapping_add(y)
        };
        let v = rescale(raw, p.output.multiplier, p.output.shift).wrapping_add(zpo);
        v.max(i32::from(clamp.min)).min(i32::from(clamp.max)) as i8 == got
    })
}

#[entry]
fn main() -> ! {
    let b = cortex_m::singleton!(: &'static mut Buffers = unsafe { &mut *core::ptr::addr_of_mut!(BUFFERS) })
        .unwrap_or_else(|| fail("setup", 0, &ConvGeometry::default()));
    let mut rng = Rng(0x4b49_4c4e); // "KILN"
    let mut cases = 0;
    // The MLPerf Tiny shapes: KWS pointwise 1x1x64, ResNet-8 3x3x16/64 (stride 1 and 2), VWW
    // pointwise over 256 channels and first layer 3x3x3 stride 2, KWS's first 10x4x1-like patch
    // (here 3x3x1), 3x3x96 (patch 864 > MAX_PATCH: the portable fallback), and depthwise maps
    // that need several strip tiles.
    let shapes = [
        fixed(5, 64, 64, 1, 1, false),
        fixed(8, 16, 16, 3, 1, false),
        fixed(4, 64, 64, 3, 1, false),
        fixed(8, 32, 64, 3, 2, false),
        fixed(3, 256, 256, 1, 1, false),
        fixed(12, 3, 8, 3, 2, false),
        fixed(10, 1, 64, 3, 2, false),
        fixed(3, 96, 8, 3, 1, false),
        fixed(6, 64, 64, 3, 1, true),
        fixed(12, 8, 8, 3, 2, true),
        fixed(3, 256, 256, 3, 1, true),
        // Depthwise strips: rows wider than one strip tile (stride 1 and 2), and a narrow,
        // tall map (one column tile, several row tiles).
        ConvGeometry {
            in_w: 150,
            out_w: 150,
            ..fixed(4, 4, 4, 3, 1, true)
        },
        ConvGeometry {
            in_w: 140,
            out_w: 70,
            ..fixed(9, 4, 4, 3, 2, true)
        },
        ConvGeometry {
            in_h: 40,
            out_h: 40,
            ..fixed(10, 8, 8, 3, 1, true)
        },
    ];
    for (i, g) in shapes.iter().enumerate() {
        if !conv_case(&mut rng, b, g, g.filter_in_c == 1 && g.in_c > 1) {
            fail("fixed shape", i, g);
        }
        cases += 1;
    }
    for i in 0..CASES {
        let g = random_geometry(&mut rng, false);
        if !conv_case(&mut rng, b, &g, false) {
            fail("conv2d_i8", i, &g);
        }
        let g = random_geometry(&mut rng, true);
        if !conv_case(&mut rng, b, &g, true) {
            fail("depthwise_conv2d_i8", i, &g);
        }
        let g = FullyConnectedGeometry {
            batch: rng.usize(1, 3),
            in_features: if i % 8 == 0 {
                rng.usize(200, 700)
            } else {
                rng.usize(1, 80)
            },
            out_features: rng.usize(1, 12),
        };
        if !fc_case(&mut rng, b, &g) {
            fail("fully_connected_i8", i, &ConvGeometry::default());
        }
        cases += 3;
        if i % 8 == 0 {
            if !add_case(&mut rng, b, i % 16 == 0) {
                fail("add_i8 / sub_i8", i, &ConvGeometry::default());
            }
            cases += 1;
        }
    }
    hprintln!(
        "kiln-kernel-check: {} cases bit-exact ({} vs portable)",
        cases,
        if CORTEX_M_DSP {
            "Cortex-M DSP fast paths"
        } else {
            "portable build"
        }
    );
    debug::exit(debug::EXIT_SUCCESS);
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    hprintln!("kiln-kernel-check: FAILED: panic");
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
