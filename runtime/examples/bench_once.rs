//! One inference of an artifact on a hosted target, for instruction counting under user-mode
//! QEMU (`kiln bench --target qemu-aarch64` builds this for aarch64 Linux and runs it twice:
//! `base` loads the model and sets the input, `infer` does the same and runs one inference; the
//! difference of the two guest instruction counts is the inference).
//!
//! `bench_once MODEL.kiln base|infer` — the input is the artifact's first SELFTEST case (zeros if
//! it has none); `infer` prints the output bytes in hex so that the caller can compare them.

use kiln_runtime::format::SectionKind;
use kiln_runtime::sections::{SelfTestCase, SelfTestHead};
use kiln_runtime::{Interpreter, Model};
use std::process::ExitCode;

/// 16-byte aligned copy of `bytes` (the runtime requires aligned artifacts and arenas).
fn aligned(len: usize) -> Vec<u128> {
    vec![0u128; len.div_ceil(16)]
}

fn run(path: &str, infer: bool) -> Result<String, String> {
    let file = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut store = aligned(file.len());
    let bytes = &mut bytemuck::cast_slice_mut::<u128, u8>(&mut store)[..file.len()];
    bytes.copy_from_slice(&file);
    let model = Model::load(bytes).map_err(|e| e.to_string())?;
    let input = model
        .container()
        .section(SectionKind::SelfTest)
        .and_then(|s| {
            let (head, rest): (SelfTestHead, &[u8]) = postcard::take_from_bytes(s).ok()?;
            (head.count > 0).then_some(())?;
            let (case, _): (SelfTestCase<'_>, &[u8]) = postcard::take_from_bytes(rest).ok()?;
            Some(case.inputs.to_vec())
        });
    let mut arena_store = aligned(model.arena_bytes());
    let arena = &mut bytemuck::cast_slice_mut::<u128, u8>(&mut arena_store)[..model.arena_bytes()];
    let mut interp = Interpreter::new(model, arena).map_err(|e| e.to_string())?;
    let dst = interp.input_bytes_mut(0).map_err(|e| e.to_string())?;
    match &input {
        Some(src) if src.len() == dst.len() => dst.copy_from_slice(src),
        _ => dst.fill(0),
    }
    if !infer {
        return Ok(String::new());
    }
    interp.invoke().map_err(|e| e.to_string())?;
    let out = interp.output_bytes(0).map_err(|e| e.to_string())?;
    Ok(out.iter().map(|b| format!("{b:02x}")).collect())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(mode)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bench_once MODEL.kiln base|infer");
        return ExitCode::from(2);
    };
    match run(path, mode == "infer") {
        Ok(hex) => {
            if !hex.is_empty() {
                println!("output: {hex}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
