//! Fast paths behind the portable kernels: same signatures, bit-exact with them.
//!
//! The public kernels (`conv::conv2d_i8`, `depthwise::depthwise_conv2d_i8`,
//! `fully_connected::fully_connected_i8`) pick a body at compile time: on a Cortex-M with the DSP
//! extension (`thumbv7em-*`: Cortex-M4/M7; `runtime/build.rs` sets `cfg(kiln_dsp_kernels)`, as
//! `cfg(target_feature = "dsp")` is unstable for ARM) the bodies of [`cortex_m`], elsewhere (or with the
//! `portable-kernels` feature) the portable reference bodies (`*_portable`), which stay public
//! so that tests and the bare-metal check image can compare the two byte for byte.
//!
//! [`cortex_m`] is compiled on every target: on ARM with DSP its primitives (SXTB16,
//! SXTAB16, SMLAD, SMLABB, SMLATT) are `asm!`, elsewhere they are emulated in plain Rust with the instructions'
//! exact semantics, so the host test suite checks the fast paths' data layout, tails and
//! arithmetic, and `firmware/kernel-check` checks the real instructions under QEMU. The design
//! is written down in `docs/KERNELS.md`.

pub mod cortex_m;

#[cfg(test)]
pub(crate) mod cases;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

/// True when this build runs the Cortex-M DSP fast paths (ARM with the `dsp` target feature and
/// without the `portable-kernels` feature).
pub const CORTEX_M_DSP: bool = cfg!(kiln_dsp_kernels);

/// True when int8 ADD/SUB parameters are in the range the vector fast paths handle: multipliers
/// not `i32::MIN`, input and output shifts in `-31..=0`, left shift in `0..=30` (every model
/// TFLM's `add_params` prepares).
#[cfg(any(target_arch = "aarch64", target_arch = "x86_64"))]
pub(crate) fn usual_add_params(p: &crate::graph::BinaryParams) -> bool {
    [p.input0, p.input1, p.output]
        .iter()
        .all(|r| r.multiplier != i32::MIN && (-31..=0).contains(&r.shift))
        && (0..=30).contains(&p.left_shift)
}

/// Which int8 kernel bodies conv, depthwise and fully connected run in this build on this CPU:
/// `cortex-m-dsp`, `neon`, `avx512-vnni` (x86-64 with VPDPBUSD; AVX2 for the rest), `avx2` or
/// `portable`.
pub fn active() -> &'static str {
    #[cfg(kiln_dsp_kernels)]
    return "cortex-m-dsp";
    #[cfg(kiln_neon_kernels)]
    return "neon";
    #[cfg(kiln_x86_kernels)]
    return if x86_64::has_avx512_vnni() {
        "avx512-vnni"
    } else if x86_64::has_avx2() {
        "avx2"
    } else {
        "portable"
    };
    #[cfg(not(any(kiln_dsp_kernels, kiln_neon_kernels, kiln_x86_kernels)))]
    return "portable";
}

/// True when every requantization entry is in the range the x86-64 output stages handle:
/// multiplier not `i32::MIN` (their `(a * b + 2^30) >> 31` high multiply equals gemmlowp's
/// everywhere else; proof at `cortex_m::requantize`) and shift in `-31..=30` (every valid TFLite
/// model). Kernels run the portable body otherwise. (The Cortex-M stage checks its own, tighter
/// bounds per channel: `cortex_m::Channel`.)
#[cfg(target_arch = "x86_64")]
pub(crate) fn usual_requant(requant: &[crate::graph::Requant]) -> bool {
    requant
        .iter()
        .all(|r| r.multiplier != i32::MIN && (-31..=30).contains(&r.shift))
}
