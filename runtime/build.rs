//! Compile-time choice of kernel bodies.
//!
//! `cfg(target_feature = "dsp")` is not visible on stable Rust for ARM (its target features are
//! unstable), so this script tells the crate which cores have the DSP extension:
//!
//! - `kiln_arm_dsp`: the target is ARMv7E-M (`thumbv7em-*`: Cortex-M4/M7), or an ARM target built
//!   with the `dsp` feature enabled; the DSP primitives of `kernels::arch::cortex_m` are `asm!`;
//! - `kiln_dsp_kernels`: `kiln_arm_dsp` without the `portable-kernels` feature; the public int8
//!   conv, depthwise and fully-connected kernels run the Cortex-M fast paths.
use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kiln_arm_dsp)");
    println!("cargo::rustc-check-cfg=cfg(kiln_dsp_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    let target = env::var("TARGET").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let features = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let dsp = target.starts_with("thumbv7em-")
        || (arch == "arm" && features.split(',').any(|f| f == "dsp"));
    if dsp {
        println!("cargo::rustc-cfg=kiln_arm_dsp");
        if env::var_os("CARGO_FEATURE_PORTABLE_KERNELS").is_none() {
            println!("cargo::rustc-cfg=kiln_dsp_kernels");
        }
    }
}
