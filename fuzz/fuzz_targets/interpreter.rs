//! Fuzzes the interpreter behind the reader: whatever `Model::load` accepts must run without a
//! panic. The input is re-sealed first (so the digest never stops it), loaded, bound to an
//! aligned arena of exactly `arena_bytes` (models asking for more than 16 MiB are skipped),
//! given zero inputs and invoked; then the outputs are read and the SELFTEST vectors run.

#![no_main]

#[path = "common.rs"]
mod common;

use kiln_runtime::sections::run_self_test;
use kiln_runtime::{Interpreter, Model};
use libfuzzer_sys::fuzz_target;

const ARENA_CAP: usize = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let bytes = common::resealed(data).unwrap_or_else(|| data.to_vec());
    let aligned = common::Aligned::new(&bytes);
    let Ok(model) = Model::load(aligned.as_slice()) else {
        return;
    };
    if model.arena_bytes() > ARENA_CAP {
        return;
    }
    let mut arena = common::Aligned::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())
        .expect("an aligned arena of exactly arena_bytes is accepted");
    for i in 0..model.inputs().len() {
        interp
            .input_bytes_mut(i)
            .expect("a graph input of a loaded model")
            .fill(0);
    }
    let _ = interp.invoke();
    for i in 0..model.outputs().len() {
        let _ = interp
            .output_bytes(i)
            .expect("a graph output of a loaded model");
    }
    let _ = run_self_test(&mut interp);
});
