//! Compile-time choice of kernel bodies.
//!
//! `cfg(target_feature = "dsp")` is not visible on stable Rust for ARM (its target features are
//! unstable), so this script tells the crate which cores have the DSP extension:
//!
//! - `kiln_arm_dsp`: the target is ARMv7E-M (`thumbv7em-*`: Cortex-M4/M7), or a Thumb target
//!   built with the `dsp` feature enabled; the DSP primitives of `kernels::arch::cortex_m` are
//!   `asm!`;
//! - `kiln_dsp_kernels`: `kiln_arm_dsp` without the `portable-kernels` feature; the public int8
//!   conv, depthwise and fully-connected kernels run the Cortex-M fast paths;
//! - `kiln_neon_kernels`: an aarch64 target (NEON is part of the base ISA) without
//!   `portable-kernels`; the same kernels run `kernels::arch::aarch64`;
//! - `kiln_x86_kernels`: an x86-64 target without `portable-kernels`; the same kernels run
//!   `kernels::arch::x86_64`, which picks AVX2 at run time (CPUID) and otherwise the portable body.
use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kiln_arm_dsp)");
    println!("cargo::rustc-check-cfg=cfg(kiln_dsp_kernels)");
    println!("cargo::rustc-check-cfg=cfg(kiln_neon_kernels)");
    println!("cargo::rustc-check-cfg=cfg(kiln_x86_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    let portable = env::var_os("CARGO_FEATURE_PORTABLE_KERNELS").is_some();
    let target = env::var("TARGET").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let features = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    // Thumb only: the `asm!` blocks are Thumb-2 (A32 mode restricts LDRD/STRD register pairs
    // and reserves r11).
    let dsp = target.starts_with("thumbv7em-")
        || (arch == "arm"
            && target.starts_with("thumb")
            && features.split(',').any(|f| f == "dsp"));
    if dsp {
        println!("cargo::rustc-cfg=kiln_arm_dsp");
        if !portable {
            println!("cargo::rustc-cfg=kiln_dsp_kernels");
        }
    }
    if arch == "aarch64" && !portable {
        println!("cargo::rustc-cfg=kiln_neon_kernels");
    }
    if arch == "x86_64" && !portable {
        println!("cargo::rustc-cfg=kiln_x86_kernels");
    }
}
