//! Fuzzes the artifact reader: `Model::load` on arbitrary bytes must return `Ok` or `Err`,
//! never panic, read out of bounds or hang. Each input is tried as given (exercising the
//! container checks and the digest) and re-sealed (so that the graph validation sees it too).
//! A model that loads has every accessor exercised.

#![no_main]

#[path = "common.rs"]
mod common;

use kiln_runtime::sections::Manifest;
use kiln_runtime::Model;
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    let aligned = common::Aligned::new(bytes);
    let Ok(model) = Model::load(aligned.as_slice()) else {
        return;
    };
    // Everything a loaded model promises.
    for i in 0..model.tensor_count() {
        model.tensor(i).expect("a tensor of a loaded model decodes");
    }
    assert_eq!(model.ops().count(), model.op_count() as usize);
    for op in model.ops() {
        op.expect("an op of a loaded model decodes");
    }
    let _ = Manifest::of(&model);
    let c = model.container();
    for i in 0..c.signature_count() + 1 {
        let _ = c.signature(i);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(resealed) = common::resealed(data) {
        check(&resealed);
    }
});
