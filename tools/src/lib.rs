//! `kiln`, the host tool, as a library: importers, the host IR, passes, quantization, lowering
//! and memory planning, the artifact writer, evaluation, and the helpers behind the CLI.

pub mod artifact;
pub mod bench;
pub mod bench_qemu;
pub mod convert;
pub mod demo;
pub mod demo_fleet;
pub mod device_link;
pub mod distill;
pub mod eval;
pub mod exec_candle;
pub mod fleet;
pub mod import;
pub mod inspect;
pub mod ir;
pub mod lower;
pub mod npy;
pub mod passes;
pub mod plan;
pub mod prune;
pub mod quantize;
pub mod runner;
pub mod signing;
pub mod weights;
